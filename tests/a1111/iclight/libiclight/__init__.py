"""Stand-in for IC-Light's ``libiclight`` package (see ../README.md)."""
