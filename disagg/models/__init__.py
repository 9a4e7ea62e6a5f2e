"""Deployments of several models behind one router (deployment.py)."""
