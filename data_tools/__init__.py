"""Data tools: the RecordIO on-disk format and the commands that make or check data."""
