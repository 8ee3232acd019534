"""What the real-facts experiment adds to comm: its config sections, resolver, data generator,
first-use build of its bases and comm-eval's tasks for its runs."""

from comm_cli.experiments.real_facts.config import FactsConfig, FactsTaskConfig, settings_hash
from comm_cli.registry import Experiment, register

EXPERIMENT = register(
    Experiment(
        name="real_facts",
        section="facts",
        section_schema=FactsConfig,
        data_section="facts",
        data_schema=FactsTaskConfig,
        resolvers={"comm_facts_hash": settings_hash},
        data="comm_cli.experiments.real_facts.data",
        prepare="comm_cli.experiments.real_facts.setup:prepare",
        eval_suite="real_facts",
    )
)
