"""Imported by a fork server in tests/test_forkserver.py: runs one of torch's parallel regions at import, as an import
that made forking unsafe would."""

import torch

torch.ones(1 << 22).sum()
(torch.ones(1024, 1024) @ torch.ones(1024, 1024)).sum()
