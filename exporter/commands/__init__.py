"""The CLI's commands: each parses its options and calls one library function."""
