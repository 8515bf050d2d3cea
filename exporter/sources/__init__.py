"""Model sources: the zoo, user modules, checkpoints (the reference's included), and the digits images."""
