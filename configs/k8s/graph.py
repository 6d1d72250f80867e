"""The BentoML service graph as the generator needs it, read from the service objects.

``walk(root)`` follows ``bentoml.depends`` from the entry service and returns, per service, what
its ``@bentoml.service(...)`` and ``@bentoml.api(...)`` declared: name, dependencies, workers,
resources, traffic and the batchable APIs' ``max_batch_size``. Those values come from the config
the services were imported with (``lmm.config.load_config``), so a graph for a given config is
read in a fresh interpreter with ``LMM_CONFIG_FILE`` naming it::

    LMM_CONFIG_FILE=configs/default.yaml python -m configs.k8s.graph     # JSON on stdout
"""

from __future__ import annotations

import json
import sys


def walk(root) -> list[dict]:
    """Every service reachable from ``root`` (a BentoML Service), entry first, breadth first."""
    graph, queue, seen = [], [root], {root.name}
    while queue:
        svc = queue.pop(0)
        deps = [d.on for d in svc.dependencies.values() if d.on is not None]  # not url= ones
        batch_caps = [api.max_batch_size for api in svc.apis.values() if api.batchable]
        graph.append(
            {
                "name": svc.name,
                "depends": sorted(dep.name for dep in deps),
                "entry": svc is root,
                "workers": svc.config.get("workers", 1),
                "resources": dict(svc.config.get("resources") or {}),
                "traffic": dict(svc.config.get("traffic") or {}),
                "max_batch_size": max(batch_caps, default=None),
            }
        )
        for dep in deps:
            if dep.name not in seen:
                seen.add(dep.name)
                queue.append(dep)
    return graph


def main() -> int:
    from service import LMMService

    json.dump(walk(LMMService), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
