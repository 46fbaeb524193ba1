"""Typed configs: dataclasses <-> nested plain data <-> YAML files, with line-numbered errors.

The ground floor every layer may use: commands declare their config with `opt`,
file formats users write (task files, policies, probe packs, lexicons) are read
with `read_yaml` and checked with `config_from_dict`, and every bad key or value
becomes one `UsageError` line (``file:line: key: problem (did you mean ...)``).

Files users write are records (`weightsmith.config.records`): `load_record` checks
parsed YAML or JSON against a record class (nested records, lists, mappings, tagged
unions on ``type:``), and each format's ``check()`` step uses the records' `Where`.

Not here: argparse (``weightsmith.cli.args`` builds flags from the same fields).
"""

from weightsmith.config.build import (
    build_config,
    config_from_dict,
    config_to_dict,
    values_from_mapping,
)
from weightsmith.config.fields import (
    NONE_WORDS,
    BadValue,
    Key,
    T,
    check_choices,
    choice_name,
    choices_of,
    coerce,
    describe,
    did_you_mean,
    field_default,
    field_label,
    flag_name,
    group_prefix,
    init_fields,
    is_fixed_tuple,
    is_flattened,
    is_repeatable,
    item_types,
    leaves,
    nested_class,
    opt,
    show_value,
    split_commas,
    split_optional,
    splits,
    visible_fields,
)
from weightsmith.config.records import BadField, Where, load_record, nonempty, where_field
from weightsmith.config.yaml_files import (
    LineLoader,
    MarkedDict,
    MarkedList,
    dump_config_yaml,
    load_config_yaml,
    read_yaml,
)

__all__ = [
    "NONE_WORDS",
    "BadField",
    "BadValue",
    "Key",
    "LineLoader",
    "MarkedDict",
    "MarkedList",
    "T",
    "Where",
    "build_config",
    "check_choices",
    "choice_name",
    "choices_of",
    "coerce",
    "config_from_dict",
    "config_to_dict",
    "describe",
    "did_you_mean",
    "dump_config_yaml",
    "field_default",
    "field_label",
    "flag_name",
    "group_prefix",
    "init_fields",
    "is_fixed_tuple",
    "is_flattened",
    "is_repeatable",
    "item_types",
    "leaves",
    "load_config_yaml",
    "load_record",
    "nested_class",
    "nonempty",
    "opt",
    "read_yaml",
    "show_value",
    "split_commas",
    "split_optional",
    "splits",
    "visible_fields",
    "values_from_mapping",
    "where_field",
]
