"""``python -m mnist_dist.doctor``: the ``mnist-dist doctor`` preflight as a module, for launchers
(``accelerate launch -m mnist_dist.doctor``, torchrun, ``launch/doctor.sbatch``). The checks are in ``preflight/``."""

from .cli import doctor_command, run_as_process

if __name__ == "__main__":
    run_as_process(doctor_command, prog_name="python -m mnist_dist.doctor")
