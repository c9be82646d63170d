"""The preflight behind ``mnist-dist doctor``: what each rank sees (facts), judged over all ranks
(verdicts), run and reported (doctor)."""
