"""fedtune simulations."""
