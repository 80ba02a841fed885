"""The Ray cluster a run uses: joining or starting it with the environment every process needs
(``ray_shell``), and checking that the spec fits it before anything starts (``capacity``)."""
