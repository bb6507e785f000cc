"""A PACS or VNA spoken to over DICOMweb, named by a URI: ``dicomweb://host:port/dicom-web?Filter=value&...``.

The URI names the service root (``http://host:port/dicom-web``; ``dicomwebs://`` for HTTPS) and, in its
query, the QIDO-RS filters that choose the instances (``StudyDate=20190101-20191231``,
``ModalitiesInStudy=CR,DX``). Credentials never appear in a URI or a config file: the value of the
``Authorization`` header is read from an environment variable (``MEDRAY_DICOMWEB_AUTHORIZATION`` unless
``dicomweb.authorization_env`` names another), set where the job runs and inherited by Ray's workers.

Clients come from ``dicomweb-client`` (QIDO-RS, WADO-RS, STOW-RS), which parses the multipart answers.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from medray.errors import MedrayError

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
AUTHORIZATION_ENV = "MEDRAY_DICOMWEB_AUTHORIZATION"
AUTHORIZATION_ENV_ENV = "MEDRAY_DICOMWEB_AUTHORIZATION_ENV"  # names the variable when dicomweb.authorization_env does
TIMEOUT_ENV = "MEDRAY_DICOMWEB_TIMEOUT"
TIMEOUT = 30.0  # seconds per request: a PACS that stops answering fails a request, not the whole job
PAGE_SIZE_ENV = "MEDRAY_DICOMWEB_PAGE_SIZE"
PAGE_SIZE = 500  # QIDO-RS results per request (limit/offset); many servers cap a page near 1000


class DicomWebError(MedrayError, ConnectionError):
    """A DICOMweb service that refused, did not answer, or answered something that is not DICOM."""


def is_dicomweb(uri) -> bool:
    return str(uri).split("://", 1)[0] in SCHEMES and "://" in str(uri)


@dataclass(frozen=True)
class Source:
    """A parsed ``dicomweb://`` URI: where the service is, and which instances the query chooses."""

    url: str  # http(s)://host:port/path, the DICOMweb service root
    filters: tuple[tuple[str, str], ...] = field(default=())

    @property
    def search_filters(self) -> dict[str, str]:
        return dict(self.filters)

    def __str__(self) -> str:  # the service without its filters: safe to log (no credentials are ever in it)
        return self.url


def parse(uri: str) -> Source:
    parts = urlsplit(str(uri))
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise DicomWebError(f"{uri!s:.200}: not a DICOMweb URI; write dicomweb://host:port/path?Filter=value (dicomwebs:// for HTTPS)")
    if "@" in parts.netloc:
        raise DicomWebError(
            f"dicomweb://{parts.hostname}: credentials in the URI are refused; put the Authorization header's value in ${AUTHORIZATION_ENV}"
        )
    url = f"{SCHEMES[parts.scheme]}://{parts.netloc}{parts.path.rstrip('/')}"
    return Source(url, tuple(parse_qsl(parts.query, keep_blank_values=False)))


def instance_uri(source: Source, study: str, series: str, instance: str) -> str:
    """The URI of one instance, as listings, manifests and score outputs record it; reading it is one WADO-RS request."""
    scheme = next(k for k, v in SCHEMES.items() if source.url.startswith(v + "://"))
    return f"{scheme}://{source.url.split('://', 1)[1]}/studies/{study}/series/{series}/instances/{instance}"


def parse_instance(uri: str) -> tuple[Source, str, str, str]:
    """(service, study UID, series UID, SOP instance UID) of an instance URI made by ``instance_uri``."""
    source = parse(uri.split("?", 1)[0])
    root, _, path = source.url.partition("/studies/")
    parts = path.split("/")
    if len(parts) != 5 or parts[1] != "series" or parts[3] != "instances" or not all(parts[::2]):
        raise DicomWebError(f"{uri!s:.200}: not a DICOMweb instance URI (…/studies/UID/series/UID/instances/UID)")
    return Source(root), parts[0], parts[2], parts[4]


def configure(authorization_env: str | None = None, page_size: int | None = None, timeout: float | None = None) -> None:
    """The ``dicomweb`` config section, as variables of this process set before Ray starts, so that Ray's
    local workers (which list and fetch) inherit them, as ``storage.configure_s3`` does for S3. The
    credentials themselves stay in the variable the user exported; only its name travels here."""
    for variable, value in ((AUTHORIZATION_ENV_ENV, authorization_env), (PAGE_SIZE_ENV, page_size), (TIMEOUT_ENV, timeout)):
        if value is not None:
            os.environ[variable] = str(value)


def authorization_env() -> str:
    """The name of the variable that holds the Authorization header's value."""
    return os.environ.get(AUTHORIZATION_ENV_ENV) or AUTHORIZATION_ENV


def authorization(env: str | None = None) -> str | None:
    return os.environ.get(env or authorization_env()) or None


def timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, TIMEOUT))


def page_size() -> int:
    return int(os.environ.get(PAGE_SIZE_ENV, PAGE_SIZE))


def client(uri: str | Source):
    """A ``DICOMwebClient`` for the service, sending the configured Authorization header."""
    from dicomweb_client.api import DICOMwebClient

    source = uri if isinstance(uri, Source) else parse(uri)
    token = authorization()
    headers = {"Authorization": token} if token else None
    if "timeout" in inspect.signature(DICOMwebClient).parameters:  # dicomweb-client >= 0.60 passes its own (20 s) to every request
        return DICOMwebClient(url=source.url, headers=headers, timeout=timeout())
    web = DICOMwebClient(url=source.url, headers=headers)
    web._session.request = _with_timeout(web._session.request, timeout())  # older ones set none
    return web


def _with_timeout(request, seconds: float):
    def bounded(*args, **kwargs):
        kwargs.setdefault("timeout", seconds)
        return request(*args, **kwargs)

    return bounded
