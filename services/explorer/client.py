"""A small client of the analyzer's gRPC API (proto/vitscope/v2/analyzer.proto).

Calls take the ids a user types or a URL holds and build the resource names from them; replies
are the API's own messages (``vitscope.proto.pb``), typed by the stubs generated with them.
They pickle, so Streamlit's cache can keep them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from vitscope.proto import names, pb, rpc

ImageRef = bytes | str
"""An image for the live calls: uploaded bytes, or a dataset image's name
(``activationSets/{set}/images/{image}``)."""

MAX_PAGE = 1000
"""The analyzer's largest page: fewest calls for a whole listing."""

_CHANNEL_OPTIONS = [
    # Heatmaps of k images and full PNGs can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 64 << 20),
    # A long-lived channel (the explorer caches one) must notice a restarted analyzer within
    # seconds, not after gRPC's default reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class AnalyzerError(RuntimeError):
    """A failed analyzer call, with the gRPC status code and the server's details."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"{method}: {code.name}: {details}")

    @property
    def unreachable(self) -> bool:
        """True when no analyzer answered (down, wrong address, or the deadline passed)."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class AnalyzerClient:
    """Typed calls to one analyzer. Every call has a deadline of ``timeout`` seconds and raises
    :class:`AnalyzerError` on failure. ``token`` is sent as ``authorization: Bearer <token>``;
    ``root_certificates`` (PEM) switches to TLS."""

    def __init__(self, target: str, token: str | None = None, timeout: float = 10.0,
                 root_certificates: bytes | None = None):
        self.target = target
        self.timeout = timeout
        if root_certificates is None:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
        self._stub = rpc.AnalyzerStub(self._channel)
        self._metadata: Sequence[tuple[str, str]] = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, method: str, request, timeout: float | None = None, wait_for_ready: bool = False):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata,
                                               wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:  # raised by the stub as a grpc.Call carrying code() and details()
            raise AnalyzerError(method, e.code(), e.details() or "") from None

    def _every_page(self, method: str, request: Callable[[str], Any], field: str,
                    wait_for_ready: bool = False) -> list[Any]:
        """The items of every page of a List call; ``request(token)`` builds each page's request."""
        out: list[Any] = []
        token = ""
        while True:
            resp = self._call(method, request(token), wait_for_ready=wait_for_ready)
            out += getattr(resp, field)
            token = resp.next_page_token
            if not token:
                return out

    def list_saes(self, wait_for_ready: bool = False) -> list[pb.Sae]:
        """Every SAE in the analyzer's store (all pages), by name. ``wait_for_ready``: an analyzer
        that does not answer yet (still starting) is waited for, up to the call's deadline,
        instead of failing at once."""
        return self._every_page("ListSaes", lambda t: pb.ListSaesRequest(page_size=MAX_PAGE, page_token=t), "saes",
                                wait_for_ready)

    def get_sae(self, sae_id: str) -> pb.Sae:
        """One SAE with its metrics and firing-frequency histogram."""
        return self._call("GetSae", pb.GetSaeRequest(name=names.sae(sae_id)))

    def list_latents(self, sae_id: str, page_size: int = 50, page_token: str = "", order_by: str = "",
                     min_frequency: float = 0.0, max_frequency: float = 0.0,
                     label_query: str = "") -> pb.ListLatentsResponse:
        """One page of latent statistics and labels. ``order_by`` as AIP-132 spells it
        ("frequency desc", the default; "max_activation desc", "index", ...); a frequency bound
        of 0 means unbounded; ``label_query`` keeps labelled latents whose label or notes hold
        every word of it ("*": every labelled latent)."""
        return self._call("ListLatents", pb.ListLatentsRequest(
            parent=names.sae(sae_id), page_size=page_size, page_token=page_token, order_by=order_by,
            min_frequency=min_frequency, max_frequency=max_frequency, label_query=label_query))

    def labelled_latents(self, sae_id: str) -> list[pb.Latent]:
        """Every labelled latent of the SAE with its statistics and label (all pages, by frequency)."""
        parent = names.sae(sae_id)
        return self._every_page("ListLatents", lambda t: pb.ListLatentsRequest(
            parent=parent, page_size=MAX_PAGE, page_token=t, label_query="*"), "latents")

    def get_latent(self, sae_id: str, latent: int, top_images: int | None = None, heatmaps: bool = True,
                   view: pb.TopImagesView = pb.TOP_IMAGES_VIEW_UNSPECIFIED) -> pb.Latent:
        """A latent's statistics, distributions and top images in ``view`` (with per-patch
        heatmaps if asked). ``top_images=None`` lets the server choose (16, or fewer if the
        analysis kept fewer)."""
        request = pb.GetLatentRequest(name=names.latent(sae_id, latent), heatmaps=heatmaps, view=view)
        if top_images is not None:
            request.top_images = top_images
        return self._call("GetLatent", request)

    def get_image(self, image: str) -> pb.Image:
        """A dataset image (``activationSets/{set}/images/{image}``) as the model saw it
        (resized and cropped), as PNG bytes."""
        return self._call("GetImage", pb.GetImageRequest(name=image))

    def encode_image(self, sae_id: str, image: ImageRef, top_latents: int | None = None) -> pb.EncodedImage:
        """The latents that fire on each patch of an image and on the whole of it."""
        request = pb.EncodeImageRequest(sae=names.sae(sae_id), image=_source(image))
        if top_latents is not None:
            request.top_latents = top_latents
        return self._call("EncodeImage", request)

    def get_heatmap(self, sae_id: str, latent: int, image: ImageRef) -> pb.Heatmap:
        """One latent's activation on every patch of an image."""
        return self._call("GetHeatmap", pb.GetHeatmapRequest(latent=names.latent(sae_id, latent), image=_source(image)))

    def search_latents(self, sae_id: str, positives: Sequence[pb.SearchExample | ImageRef],
                       negatives: Sequence[pb.SearchExample | ImageRef] = (),
                       top_latents: int | None = None) -> pb.SearchLatentsResponse:
        """Latents that fire on the positive examples and not on the negative ones, best first."""
        request = pb.SearchLatentsRequest(sae=names.sae(sae_id), positives=[_example(e) for e in positives],
                                          negatives=[_example(e) for e in negatives])
        if top_latents is not None:
            request.top_latents = top_latents
        return self._call("SearchLatents", request)

    def find_similar_latents(self, sae_id: str, latent: int, other_sae: str | None = None,
                             top_latents: int | None = None,
                             timeout: float | None = None) -> pb.FindSimilarLatentsResponse:
        """The latents most like ``latent``: in its own SAE, or in SAE ``other_sae`` (an id).
        Matching across spaces encodes a sample of images with both SAEs (through a ViT when the
        other SAE reads another set), which can outlast the client's usual deadline: ``timeout``
        overrides it for this call."""
        request = pb.FindSimilarLatentsRequest(latent=names.latent(sae_id, latent),
                                               other_sae=names.sae(other_sae) if other_sae else "")
        if top_latents is not None:
            request.top_latents = top_latents
        return self._call("FindSimilarLatents", request, timeout)

    def get_label(self, sae_id: str, latent: int) -> pb.LatentLabel:
        """A latent's current label (revision 0 and etag "" when it has none)."""
        return self._call("GetLatentLabel", pb.GetLatentLabelRequest(name=names.label(sae_id, latent)))

    def update_label(self, sae_id: str, latent: int, text: str, notes: str, author: str, etag: str) -> pb.LatentLabel:
        """Write a new revision of a latent's label over the one whose ``etag`` is given; an
        :class:`AnalyzerError` with code ABORTED means someone else wrote in between."""
        label = pb.LatentLabel(name=names.label(sae_id, latent), text=text, notes=notes, author=author)
        return self._call("UpdateLatentLabel", pb.UpdateLatentLabelRequest(label=label, etag=etag))

    def label_revisions(self, sae_id: str, latent: int) -> list[pb.LatentLabel]:
        """Every revision of a latent's label, newest first (all pages)."""
        name = names.label(sae_id, latent)
        return self._every_page("ListLatentLabelRevisions", lambda t: pb.ListLatentLabelRevisionsRequest(
            name=name, page_size=MAX_PAGE, page_token=t), "labels")

    def get_evaluation(self, sae_id: str) -> pb.Evaluation | None:
        """The SAE's newest evaluation report with its plots, or None when it has none."""
        try:
            return self._call("GetEvaluation", pb.GetEvaluationRequest(name=names.evaluation(sae_id)))
        except AnalyzerError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def steer_latents(self, sae_id: str, image: ImageRef, scales: dict[int, float],
                      timeout: float | None = None) -> pb.SteerLatentsResponse:
        """Scale latents ({latent: factor}; 0 ablates) inside the SAE's ViT for one image: the
        final embedding's cosine before and after and the zero-shot classes' probabilities. It
        runs the ViT twice, which can outlast the usual deadline: ``timeout`` overrides it."""
        request = pb.SteerLatentsRequest(sae=names.sae(sae_id), image=_source(image),
                                         scales=[pb.LatentScale(latent_index=k, factor=v) for k, v in scales.items()])
        return self._call("SteerLatents", request, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AnalyzerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _source(image: ImageRef) -> pb.ImageSource:
    return pb.ImageSource(image_data=image) if isinstance(image, bytes) else pb.ImageSource(image=image)


def _example(e: pb.SearchExample | ImageRef) -> pb.SearchExample:
    return e if isinstance(e, pb.SearchExample) else pb.SearchExample(image=_source(e))


def sae_id(sae: pb.Sae) -> str:
    """The id in an SAE's name (``saes/{sae}``)."""
    return names.parse_sae(sae.name)


def image_index(example: pb.Example | pb.Image) -> int:
    """The row of an example's (or image's) image in its activation set."""
    return names.parse_image(example.image if isinstance(example, pb.Example) else example.name)[1]
