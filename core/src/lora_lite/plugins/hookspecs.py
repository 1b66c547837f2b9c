"""The hooks a lora-lite plugin may implement (pluggy, project name ``lora_lite``).

A plugin is any module or object with functions marked ``@lora_lite.hookimpl``, exposed through
an entry point in the group ``lora_lite``::

    [project.entry-points.lora_lite]
    myvariant = "my_package.plugin"

The command line adds one more hook of the same project, ``register_commands(app)``
(``lora_lite_cli.hookspecs``): core itself has no command line.
"""
import pluggy

hookspec = pluggy.HookspecMarker("lora_lite")
hookimpl = pluggy.HookimplMarker("lora_lite")


@hookspec
def register_variants(register):
    """Call ``register(VariantClass)`` once per adapter variant this plugin provides."""


@hookspec
def register_weight_backends(register):
    """Call ``register(backend)`` for each quantized layer type this plugin can read and write.

    A backend has ``handles(layer) -> bool``, ``read(layer) -> fp32 (d_out, d_in)``,
    ``write(layer, dense)``, ``snapshot(layer)``/``restore(layer, snap)`` (bit-exact undo of a
    write) and optionally ``guard_training(model) -> undo`` (see ``lora_lite.layers.weights``).
    """

