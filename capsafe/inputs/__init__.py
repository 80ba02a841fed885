"""The file formats capsafe reads: capability-task records (``task_data``), safety suites in benchmark formats
(``suites``) and the jailbreak wrappers applied to them (``jailbreaks``). Resolving a whole run's inputs is
``capsafe.run_inputs``."""
