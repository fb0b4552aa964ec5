"""Fake of IC-Light's ``libiclight`` package (see ../README.md)."""
