"""How it runs: the only package that imports Ray.

``engines``   the two executors of the stage graph (threads in this process, or Ray actors):
              bounded in-flight backpressure, error propagation, the run's CPU profile
``malloc``    glibc's malloc tuned for a process that runs workers
``jobs/``     backup (images, devices, overlays, vSphere VMs), restore, and their planning
``cli/``      the command line: one module per command (``cli.registry`` lists them)
``console``   warnings, notes, byte sizes, tables and JSON on the terminal
``locking``   the repository's locks as jobs and commands take them
``accel``     QEMU's accelerator for ``comb boot`` (KVM when it works here, else TCG)
"""
