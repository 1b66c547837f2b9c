"""JSON output: values as JSON (dtypes as names, tuples as lists), printed on stdout alone."""
from __future__ import annotations

import json

import typer


def jsonable(value):
    """Config defaults and figures as JSON values (dtypes as names, tuples as lists)."""
    import torch
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def print_json(data):
    """JSON on stdout, nothing else (progress and warnings go to stderr)."""
    typer.echo(json.dumps(jsonable(data), indent=2))
