"""fedtune client."""
