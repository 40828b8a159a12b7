"""Ray Tune layer: the only package besides the CLI that imports ray."""
