"""The instances a ``dicomweb://`` URI chooses: listed with QIDO-RS page by page, each read with one WADO-RS request.

Listing searches studies first, with the URI's study-level filters (``StudyDate``, ``AccessionNumber``, ...),
then the instances of each study with the other filters (``Modality``, ``SeriesDescription``, ...): servers match
study-level attributes in a study search only (Orthanc answers an instance search filtered by
``ModalitiesInStudy`` with nothing). ``ModalitiesInStudy`` (``CR,DX``: any of them) is matched here, on the
study results, which carry it (PS3.18 table 6.7.1-2): Orthanc 1.10 pages a search filtered by it wrongly (every
page after the first comes back empty, measured), and a listing must never lose studies quietly. Both searches
page with ``limit``/``offset`` (``dicomweb.page_size``) and go on while a page comes back full or with the
``Warning`` header by which a server says it cut the answer short (PS3.18 8.3.4.2), so a server whose own cap is
below the page size loses nothing.

The order is stable whatever order the server answers in, since scoring's exactly-once resumption compares each
part's listing with what it committed: the study UIDs are collected and sorted (tens of bytes each: a few MB for
100,000 studies), then each study's instances are listed sorted by series and SOP instance UID. A study the server
repeats across pages is listed once. Paging assumes the store does not change while it is listed; a store that
changed between a killed run and its rerun (a study arrived within the filters) lists differently, and scoring
refuses that as a changed input rather than scoring anything twice or not at all.

Reading (``read_instance``) runs in the Ray task that decodes the instance, never in the driver: one WADO-RS GET
of the instance as stored (``transfer-syntax=*``), whose Part 10 bytes go to medray.io.dicom as they are. They are
never parsed by pydicom first (a deflated file would be inflated whole, the bomb medray.io.dicom guards against).

Every request has ``dicomweb.timeout`` and a few retries (on 429/502/503/504 and failed connections), so a dead
PACS fails in seconds. Failures are ``DicomWebError`` lines naming the service root (an instance's URI when one
instance fails), never a filter's value: filters can be patient IDs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from medray.io import dicomweb
from medray.io.dicomweb import DicomWebError, Source

ATTEMPTS = 3  # tries per request, the first included
STUDY_UID, SERIES_UID, SOP_UID, ACCESSION, MODALITIES = "0020000D", "0020000E", "00080018", "00080050", "00080061"
# Attributes a QIDO-RS study search matches (PS3.18 table 10.6.1-5, and the usual optional ones); all other
# filters apply to each study's instances.
STUDY_LEVEL = frozenset({
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "SOPClassesInStudy", "ReferringPhysicianName",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "StudyDescription",
})  # fmt: skip
PAGING = frozenset({"limit", "offset", "includefield"})  # medray's own parameters


@dataclass(frozen=True)
class Instance:
    uri: str  # dicomweb.instance_uri: what manifests and score outputs record
    study: str
    series: str
    sop: str
    accession: str = ""  # from the study search result; "" where the study has none


def iter_instances(uri: str) -> Iterator[Instance]:
    """Every instance the URI's filters choose, in a stable order (sorted studies, then sorted instances)."""
    source = dicomweb.parse(uri)
    study_filters, instance_filters, modalities = _split_filters(source)
    session, size = _session(dicomweb.authorization(), dicomweb.timeout()), dicomweb.page_size()
    studies: dict[str, str] = {}  # study UID → accession number
    for item in _pages(session, source, "/studies", {**study_filters, "includefield": f"{ACCESSION},{MODALITIES}"}, size):
        study = _value(item, STUDY_UID)
        if study and (modalities is None or modalities & set(_values(item, MODALITIES))):
            studies.setdefault(study, _value(item, ACCESSION))
    for study in sorted(studies):
        params = {**instance_filters, "includefield": SERIES_UID}
        found = {(_value(i, SERIES_UID), _value(i, SOP_UID)) for i in _pages(session, source, f"/studies/{study}/instances", params, size)}
        for series, sop in sorted(found):
            if series and sop:
                yield Instance(dicomweb.instance_uri(source, study, series, sop), study, series, sop, studies[study])


def read_instance(uri: str) -> bytes:
    """The Part 10 bytes of one instance (a ``dicomweb.instance_uri``), as the PACS stores it."""
    service, study, series, sop = dicomweb.parse_instance(uri)
    session = _session(dicomweb.authorization(), dicomweb.timeout())
    url = f"{service.url}/studies/{study}/series/{series}/instances/{sop}"
    response = _get(session, url, 'multipart/related; type="application/dicom"; transfer-syntax=*', uri, instance=True)
    return _single_part(response, uri)


def _split_filters(source: Source) -> tuple[dict[str, str], dict[str, str], set[str] | None]:
    """(study search filters, instance search filters, the modalities a study must have one of, or None)."""
    study, instance, modalities = {}, {}, None
    for key, value in source.filters:
        if key.lower() in PAGING:
            raise DicomWebError(f"{source}: '{key}' in a dicomweb:// URI is refused: medray pages by itself (dicomweb.page_size)")
        if _keyword(key) == "ModalitiesInStudy":
            modalities = (modalities or set()) | {m.strip() for m in re.split(r"[,\\]", value) if m.strip()}
        else:
            (study if _keyword(key) in STUDY_LEVEL else instance)[key] = value
    return study, instance, modalities


def _keyword(key: str) -> str:
    """A filter's keyword: as written, or the keyword of a tag written as 8 hex digits (``00080020``)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        from pydicom.datadict import keyword_for_tag

        return keyword_for_tag(int(key, 16)) or key
    return key


def _values(item: dict, tag: str) -> list[str]:
    return [str(v).strip() for v in (item.get(tag) or {}).get("Value") or []]


def _value(item: dict, tag: str) -> str:
    return next(iter(_values(item, tag)), "")


def _pages(session, source: Source, path: str, params: dict, size: int) -> Iterator[dict]:
    offset = 0
    while True:
        response = _get(
            session, source.url + path, "application/dicom+json", str(source), params={**params, "limit": size, "offset": offset}
        )
        try:
            page = response.json() if response.content else []
        except ValueError:
            raise DicomWebError(f"DICOMweb service {source}: a QIDO-RS search answered something that is not DICOM JSON") from None
        if not isinstance(page, list):
            page = [page]  # some servers send a single result as an object
        yield from page
        # A page shorter than asked ends the listing, unless the server says it cut the page short.
        if not page or (len(page) < size and "Warning" not in response.headers):
            return
        offset += len(page)


@functools.lru_cache(maxsize=4)
def _session(authorization: str | None, timeout: float):
    """One HTTP session per process and credentials: connections are reused across the instances a task reads."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=ATTEMPTS - 1, backoff_factor=0.5, status_forcelist=(429, 502, 503, 504),
                  allowed_methods=frozenset({"GET"}), raise_on_status=False)  # fmt: skip
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(max_retries=retry))
    if authorization:
        session.headers["Authorization"] = authorization
    session.request = functools.partial(session.request, timeout=timeout)
    return session


def _get(session, url: str, accept: str, name: str, params: dict | None = None, instance: bool = False):
    """A GET, or the ``DicomWebError`` that says in one line why it failed. ``name``: the service root (a
    search) or the instance's URI (a read); what the request searched for is never part of a message."""
    import requests

    what = name if instance else f"DICOMweb service {name}"
    try:
        response = session.get(url, params=params, headers={"Accept": accept})
    except (requests.ConnectionError, requests.Timeout):
        raise DicomWebError(
            f"{what} did not connect or answer within {dicomweb.timeout():g} s ({ATTEMPTS} tries; dicomweb.timeout): "
            "check that the PACS is up and the URI's host and port are right"
        ) from None
    except requests.RequestException as err:
        raise DicomWebError(f"{what}: request failed ({err.__class__.__name__})") from None
    if response.status_code in (401, 403):
        env = dicomweb.authorization_env()
        advice = (
            f"check the credentials in ${env}"
            if dicomweb.authorization()
            else f"${env} is not set: export the Authorization header's value there"
        )
        raise DicomWebError(f"{what} refused the request (HTTP {response.status_code}): {advice}")
    if instance and response.status_code in (404, 410):
        raise DicomWebError(f"{what}: no such instance on the PACS (HTTP {response.status_code}; deleted since it was listed?)")
    if response.status_code >= 400:
        kind = "WADO-RS retrieve" if instance else "QIDO-RS search"
        raise DicomWebError(f"{what}: the {kind} answered HTTP {response.status_code}")
    return response


def _single_part(response, uri: str) -> bytes:
    """The one body part of a ``multipart/related`` answer (or the bare body of a server that sends it unwrapped)."""
    media, _, params = response.headers.get("Content-Type", "").partition(";")
    media, body = media.strip().lower(), response.content
    if media == "application/dicom":
        return body
    boundary = re.search(r'boundary="?([^";]+)"?', params, re.IGNORECASE)
    if media != "multipart/related" or not boundary:
        raise DicomWebError(f"{uri}: the WADO-RS retrieve answered {media or 'no content type'}, not DICOM")
    marker = b"--" + boundary.group(1).strip().encode()
    start = body.find(marker)
    head_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + marker, head_end) if head_end >= 0 else -1
    if end < 0:
        raise DicomWebError(f"{uri}: the WADO-RS retrieve answered a malformed multipart message")
    if not body.startswith(b"--", end + 2 + len(marker)):
        raise DicomWebError(f"{uri}: the WADO-RS retrieve answered more than one part for one instance")
    return body[head_end + 4 : end]
