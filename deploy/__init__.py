"""Deployment Engine tooling: real ``flower-superlink`` / ``flower-supernode`` processes.

Everything the simulation wrapper does on one machine, split into the steps a real multi-host
deployment performs on its own hosts (see ``deploy/README.md``):

- :mod:`serforget.deploy.pki` - the CA, the SuperLink's TLS certificate, SuperNode authentication keys;
- :mod:`serforget.deploy.processes` - starting processes with PID files and stopping exactly those;
- :mod:`serforget.deploy.local` - a whole federation on one machine (loopback): provisioning, SuperLink
  with TLS and node authentication, K SuperNodes, the ``$FLWR_HOME`` connection, ``flwr run``
  with a checked final status.

Like ``common``, nothing here imports ``flwr``: the Flower programs are run as programs.
"""
