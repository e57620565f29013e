"""A run described by options, below every entry point: the options (defaults, YAML files, precedence), the
specs they hold (models, data, shapes, normalisation) and what they build (model, data, pruner), checked cheapest
first. The ``lm-plugin`` commands and NNI trials are thin layers on top of :func:`build_run`."""

from .build import (
    DEMO_DEFAULTS,
    NEAR_CHANCE,
    Run,
    build_model,
    build_pruner,
    build_run,
    describe_run,
    finetune_settings,
    frontier,
    prepare,
    say,
    staged_output,
)
from .options import FINETUNE, LATENCY, MODEL, OUTPUT, SELECT, Options, add_options, resolve
from .specs import BadInputError, DataSpec, import_object, load_model, parse_data_spec, parse_normalize, parse_shape

__all__ = ["DEMO_DEFAULTS", "FINETUNE", "LATENCY", "MODEL", "NEAR_CHANCE", "OUTPUT", "SELECT", "BadInputError",
           "DataSpec", "Options", "Run", "add_options", "build_model", "build_pruner", "build_run", "describe_run",
           "finetune_settings", "frontier", "import_object", "load_model", "parse_data_spec", "parse_normalize",
           "parse_shape", "prepare", "resolve", "say", "staged_output"]
