"""The sync twin of the client, for worker processes: same classes, same methods, no ``await``.

from chunkq.sync import JobChunkingService, JobChunkRepository, CrawlJobRepository
"""

from ._sync.repositories import CrawlJobRepository, JobChunkRepository, RateLimitRepository
from ._sync.service import JobChunkingService

__all__ = ["CrawlJobRepository", "JobChunkRepository", "JobChunkingService", "RateLimitRepository"]
