"""How it runs: the only package that imports Ray.

``engines``   the stage graph on Ray actors, and the choice of engine: bounded in-flight
              backpressure, error propagation, the run's CPU profile
``ray_actors``  the Ray actors (a fused worker, a dedup-index shard) and the index client
``ray_placement``  the cluster nodes a job file's ``node`` names
``engine_local``  the same on threads in this process (the baseline)
``ray_local`` this user's own ``ray start`` Ray on this machine, to use instead of starting one
``ray_processes``  comb's signal handlers around ``ray.init``; reaping an embedded Ray's leftovers
``profile``   a run's seconds per stage summed over the workers, and its timeline file
``signals``   SIGINT, SIGTERM (interrupt, or wait for a commit) and SIGHUP (``job serve``)
``malloc``    glibc's malloc tuned for a process that runs workers
``jobs/``     backup (images, devices, overlays, vSphere VMs), copy, restore, and their planning
``cli/``      the command line: one module per command (``cli.registry`` lists them)
``console``   warnings, notes, byte sizes, tables and JSON on the terminal
``locking``   the repository's locks as jobs and commands take them
``accel``     QEMU's accelerator for ``comb boot`` (KVM when it works here, else TCG)
"""
