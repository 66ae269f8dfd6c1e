"""``python -m patch_diffusion``: the same command as ``patch-diffusion``, which torchrun
needs to start one process per GPU (``torchrun --nproc_per_node N -m patch_diffusion train``)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="patch-diffusion")
