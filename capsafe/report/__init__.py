"""The report, computed from the Parquet tables alone: ``build`` writes ``report.md`` and the console summary
from the rate tables and comparisons (``tables``, ``stats``), judge agreement (``agreement``), the
equal-capability band (``capability``), the headline findings (``findings``), robustness across benchmarks
and judges (``robustness``), judge prompt variants (``variants``) and the plots and HTML (``html``)."""
