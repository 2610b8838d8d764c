"""fedtune deployment: keys, a coordinator (Flower SuperLink) and device clients (SuperNodes)."""
