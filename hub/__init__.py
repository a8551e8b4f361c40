"""SEPAS reference hub."""
