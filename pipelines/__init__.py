"""Thin glue: DVC stage entry points and Prefect flows over gsm's stage functions."""
