"""Ray, started for llmserve on this machine, or joined.

A local Ray listens on loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 with node IP 127.0.0.1
(without it, Ray's servers listen on every interface and on the machine's own address). No
dashboard; the object store capped; session files under a temp folder llmserve removes at
shutdown; the cluster's auth token kept in the environment of its processes, not written to the
user's home.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass

DEFAULT_OBJECT_STORE_BYTES = 512 << 20


@dataclass
class RaySession:
    temp_dir: str | None  # None when joined: someone else's cluster, not ours to stop

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray(num_cpus: int, address: str | None = None, object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
              ) -> RaySession:
    if address:  # an existing cluster: its own settings apply
        import ray

        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return RaySession(None)
    # Read by Ray's processes as they start (some at import): set before Ray starts them. Ray reads
    # it at import too, and this process may have imported Ray already: its constant is set as well.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False

    temp_dir = tempfile.mkdtemp(prefix="llmserve-ray-")
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             object_store_memory=object_store_bytes, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False)
    return RaySession(temp_dir)
