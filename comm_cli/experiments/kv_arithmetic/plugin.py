"""What the key-value experiment adds to comm: its config sections, resolver, data generator,
first-use build of the specialists and comm-eval's tasks for its runs."""

from comm_cli.experiments.kv_arithmetic.config import KVConfig, KVTaskConfig, settings_hash
from comm_cli.registry import Experiment, register

EXPERIMENT = register(
    Experiment(
        name="kv_arithmetic",
        section="kv",
        section_schema=KVConfig,
        data_section="kv",
        data_schema=KVTaskConfig,
        resolvers={"comm_kv_hash": settings_hash},
        data="comm_cli.experiments.kv_arithmetic.data",
        prepare="comm_cli.experiments.kv_arithmetic.setup:prepare",
        eval_suite="kv_arithmetic",
    )
)
