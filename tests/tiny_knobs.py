"""Knobs that fit the width-32 models of lora_lite.testing.tiny_models (a variant not listed gets r=4 and
its own defaults), shared by the architecture matrix and the dtype tests."""
TINY_KNOBS = {
    "antipasto_rot": dict(block_size=2),
    "antipasto_arrow": dict(block=2),
    "antipasto_dplr": dict(lora_rank=2),
    "road": dict(group_size=4),
    "oft": dict(block_size=4),
    "boft": dict(block_size=2),
}
# documented as deliberately not the identity at init (so that every tensor gets a gradient)
NOT_IDENTITY_AT_INIT = ("antipasto_ablate",)
