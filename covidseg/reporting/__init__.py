"""Figures and the severity report, shared by evaluate and predict."""
