"""fedtune coordinator."""
