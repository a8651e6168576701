"""Building sub-experts from a partition and writing them as checkpoints (``prism export``)."""
