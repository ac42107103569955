"""Job definitions a worker process imports (-I tests.jobdefs), as an application would."""

from sqla_pq.flows import define_job

define_job("greet_twice", tasks=["tests.tasks.step_one", "tests.tasks.step_two"],
           creation_hook="tests.tasks.on_create")
