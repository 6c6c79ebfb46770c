"""An MLflow ``pyfunc`` model over CIF strings, wrapping a saved :class:`SiteNetDIMRegressor`.

Input: a ``pandas.DataFrame`` with a string column ``cif`` (one CIF per row). Output: a
DataFrame with one float column (``prediction`` by default, or the target's name) in the
target's units. Load it anywhere ``matbench_dim`` is importable::

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")  # or pyfunc.load_model(uri, store)
    model.predict(pd.DataFrame({"cif": [structure.to(fmt="cif")]}))

Nothing is pickled. The model's artifacts hold the saved estimator folder
(``estimator.save``: JSON config + state dict + format version), and the wrapper is logged
"from code": MLflow stores a copy of this file and runs it when loading, which registers a
:class:`SiteNetPyfuncModel` with :func:`mlflow.models.set_model`. The loading environment
therefore needs ``matbench_dim`` installed (no ``code_paths``), with a compatible saved-model
format version.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "CIF_COLUMN",
    "ESTIMATOR_ARTIFACT",
    "CifParseError",
    "SiteNetPyfuncModel",
    "cif_frame",
    "load_model",
    "log_pyfunc_model",
    "model_signature",
    "structures_from_cifs",
]

CIF_COLUMN = "cif"
ESTIMATOR_ARTIFACT = "estimator"
_REQUIREMENTS = ("matbench-dim", "mlflow", "torch", "pymatgen", "numpy", "pandas", "scikit-learn")


class CifParseError(ValueError):
    """A row of the ``cif`` column is not a readable CIF."""


def structures_from_cifs(cifs: Sequence[Any], index: Sequence[Any] | None = None) -> list[Any]:
    """Parse CIF strings into pymatgen ``Structure`` objects.

    Raises
    ------
    CifParseError
        Naming the first bad row (position and index label) and what is wrong with it.
    """
    from pymatgen.core import Structure

    labels = list(index) if index is not None else list(range(len(cifs)))
    out = []
    for pos, (label, text) in enumerate(zip(labels, cifs, strict=True)):
        where = f"row {pos} (index {label!r}) of column {CIF_COLUMN!r}"
        if not isinstance(text, str) or not text.strip():
            raise CifParseError(
                f"{where} is not a CIF string: got {type(text).__name__} {text!r:.60}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(text, fmt="cif")
        except Exception as exc:
            raise CifParseError(f"{where} is not a readable CIF: {exc}") from exc
        if len(structure) == 0:
            raise CifParseError(f"{where} holds a structure with no sites")
        out.append(structure)
    return out


def cif_frame(structures: Sequence[Any]) -> pd.DataFrame:
    """The model's input for ``structures``: a DataFrame with one column ``cif``."""
    return pd.DataFrame({CIF_COLUMN: [s.to(fmt="cif") for s in structures]})


def model_signature(output_name: str = "prediction", with_std: bool = False) -> Any:
    """Input ``cif`` (string) -> output ``output_name`` (double), and ``<output_name>_std``
    (double) for an ensemble."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("double", output_name)]
    if with_std:
        outputs.append(ColSpec("double", f"{output_name}_std"))
    return ModelSignature(inputs=Schema([ColSpec("string", CIF_COLUMN)]), outputs=Schema(outputs))


def _has_std(estimator: Any) -> bool:
    return len(getattr(estimator, "members_", ())) >= 2


class SiteNetPyfuncModel(mlflow.pyfunc.PythonModel):
    """Predicts a property from CIF strings with a saved :class:`SiteNetDIMRegressor`.

    Parameters
    ----------
    output_name
        Name of the output column (e.g. the target, ``exfoliation_en``).
    """

    def __init__(self, output_name: str = "prediction") -> None:
        self.output_name = output_name
        self.estimator_: Any = None

    def load_context(self, context: Any) -> None:
        """Load the saved estimator folder from the artifact ``estimator``; the output column
        name comes from the model config (``output_name``)."""
        from matbench_dim.ensemble import SiteNetDIMEnsemble, is_saved_ensemble
        from matbench_dim.estimator import SiteNetDIMRegressor

        self.output_name = (context.model_config or {}).get("output_name", self.output_name)
        path = context.artifacts[ESTIMATOR_ARTIFACT]
        kind = SiteNetDIMEnsemble if is_saved_ensemble(path) else SiteNetDIMRegressor
        self.estimator_ = kind.load(path)
        logger.info("loaded %s from %s", type(self.estimator_).__name__, path)

    # MLflow reads predict's type hints; ``pd.DataFrame`` is one it accepts without deriving a
    # schema from it (``Any`` would warn). The signature is given explicitly when logging.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> Any:
        """Predict for each CIF of ``model_input[cif]``: a DataFrame with ``output_name`` (and
        ``<output_name>_std`` for an ensemble)."""
        if self.estimator_ is None:
            self.load_context(context)
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if CIF_COLUMN not in frame.columns:
            raise ValueError(
                f"the model input needs a column {CIF_COLUMN!r} of CIF strings; "
                f"got columns {list(frame.columns)}"
            )
        structures = structures_from_cifs(list(frame[CIF_COLUMN]), index=list(frame.index))
        if _has_std(self.estimator_):  # an ensemble: its mean and the members' spread
            mean, std = self.estimator_.predict(structures, return_std=True)
            columns = {self.output_name: mean, f"{self.output_name}_std": std}
            return pd.DataFrame(columns, index=frame.index)
        pred = np.asarray(self.estimator_.predict(structures), dtype=float).reshape(-1)
        return pd.DataFrame({self.output_name: pred}, index=frame.index)


def _pip_requirements() -> list[str]:
    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


@contextlib.contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI is ``uri`` inside (``Model.log`` reads it), restored after."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_pyfunc_model(
    estimator: Any,
    run_id: str,
    tracking_uri: str,
    *,
    example_structures: Sequence[Any],
    name: str = "model",
    output_name: str = "prediction",
) -> Any:
    """Log a fitted estimator as the pyfunc model ``name`` of run ``run_id``.

    The estimator is saved with ``estimator.save`` into the model's artifacts; the signature
    is ``cif`` (string) -> ``output_name`` (double) and the input example holds the CIFs of
    the first two ``example_structures``. Pip requirements are pinned to the installed
    versions (no slow inference); ``matbench-dim`` must be importable where it is loaded.
    The wrapper is logged from code (this file), so nothing is pickled. The run stays open (no fluent active run is used). Returns MLflow's ``ModelInfo``; the
    model loads from ``runs:/<run_id>/<name>`` or ``model_info.model_uri``.
    """
    from mlflow.models import Model

    if len(example_structures) == 0:
        raise ValueError("log_pyfunc_model needs at least one example structure")
    example = cif_frame(list(example_structures)[:2])
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: Model.log on its own would put the model in the
    # fluent API's current experiment (``Default``), whatever the run.
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=dict(run.data.params),
        model_type=type(estimator).__name__,
    )
    with tempfile.TemporaryDirectory(prefix="matbench_dim_pyfunc_") as tmp:
        saved = Path(tmp) / ESTIMATOR_ARTIFACT
        estimator.save(saved)
        with _use_tracking_uri(tracking_uri):
            info = Model.log(
                model_id=logged.model_id,
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=__file__,
                model_config={"output_name": output_name},
                artifacts={ESTIMATOR_ARTIFACT: str(saved)},
                signature=model_signature(output_name, _has_std(estimator)),
                input_example=example,
                pip_requirements=_pip_requirements(),
            )
    logger.info("logged pyfunc model %s (%s)", info.model_uri, name)
    return info


def load_model(model_uri: str, tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` against our store: ``runs:/<run_id>/model``,
    ``models:/<model_id>`` or a local folder; ``tracking_uri`` is resolved like
    :func:`matbench_dim.tracking.store.resolve_tracking_uri` (argument, env, default store)."""
    from matbench_dim.tracking.store import resolve_tracking_uri

    with _use_tracking_uri(resolve_tracking_uri(tracking_uri)):
        return mlflow.pyfunc.load_model(model_uri)


if __name__ != "matbench_dim.tracking.pyfunc":
    # Run by MLflow as a model-from-code file (under another module name) while loading a
    # logged model: register the wrapper. A normal import does nothing here.
    mlflow.models.set_model(SiteNetPyfuncModel())
