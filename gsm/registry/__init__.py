"""The model registry: GSM-VSR as an MLflow pyfunc (`pyfunc`), registered and gated (`register`).

Importing this package costs nothing; MLflow is imported by the submodules that need it.
"""
