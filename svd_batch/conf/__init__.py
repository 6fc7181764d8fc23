"""The Hydra configs. Importing this package declares the manifest's open mappings (see ``OPEN_MAPPINGS``)."""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# manifest.columns / defaults / where are keyed by the user's own column names. Hydra puts the whole config in
# struct mode, where `manifest.columns.image=frame` would be refused ("Key 'image' is not in struct") and only
# `+manifest.columns.image=frame` worked, although the tool's own hints print the plain form. These three
# nodes are declared open (struct off) in a schema merged first, so plain overrides add keys to them; a typo in
# any other key (`manifest.colums.image=...`) is still refused.
OPEN_MAPPINGS = ("columns", "defaults", "where")
SCHEMA_NAME = "svd_batch_open_mappings"


def _schema():
    node = OmegaConf.create({"manifest": {k: {} for k in OPEN_MAPPINGS}})
    for k in OPEN_MAPPINGS:
        OmegaConf.set_struct(node.manifest[k], False)
    return node


ConfigStore.instance().store(name=SCHEMA_NAME, node=_schema())
