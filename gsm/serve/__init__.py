"""Inference for users: stream a video or frame folder through a trained GSMamba."""
