"""The TTUR ratio x attention placement study on Ray Tune: the search space, the trials, ASHA and the report."""
