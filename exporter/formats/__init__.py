"""File contracts: what moe-export records in a graph and a bundle (read without torch)."""
