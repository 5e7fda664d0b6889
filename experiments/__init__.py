"""absl entry points: each script turns one claim into a measured table and figure."""
