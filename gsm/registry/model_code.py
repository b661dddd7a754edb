"""The registered model's entry point, logged as MLflow "models from code" (no pickled object).

MLflow runs this file when it loads the model: the gsm package beside it (the model's code_paths)
is importable by then.
"""

import mlflow

from gsm.registry.pyfunc import GSMVSRModel

mlflow.models.set_model(GSMVSRModel())
