"""Typed run configuration: schema, YAML loading, dotted overrides."""
from pretrain.config.load import config_to_dict, dump_config, load_config
from pretrain.config.schema import RunConfig
from pretrain.config.typed import ConfigError

__all__ = ["ConfigError", "RunConfig", "config_to_dict", "dump_config", "load_config"]
