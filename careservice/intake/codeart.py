"""The verification code drawn as an image and spoken as audio, and the limits on drawing it.

Speaking it is the one costly request of the form (about 0.3 s of CPU, where the image or the form
page take milliseconds). Drawing runs in one thread beside the event loop, but holds the GIL that
the SMTP and web listeners need while it runs, so besides the per-client limits on both kinds,
web.max_audio_codes_per_minute bounds the audio for all clients together.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from captcha.audio import AudioCaptcha
from captcha.image import ImageCaptcha

from careservice.config import WebConfig
from careservice.intake.formguard import ALL, RateLimit, take_all

MEDIA_TYPES = {"png": "image/png", "wav": "audio/wav"}
RENDERS_PER_POST = 5  # codes a client may fetch an hour per POST it may make
RENDERS_PER_MINUTE = 5  # codes a client may fetch a minute: one client gets a small share of the audio cap
IMAGE_BACKGROUND = (22, 52, 84)  # white digits on dark blue: captcha fades glyphs by their brightness
IMAGE_DIGITS = (255, 255, 255, 255)


class CodeArt:
    """The limits on drawing codes, and the thread that draws them."""

    def __init__(self, web: WebConfig) -> None:
        self.hourly = RateLimit(web.max_posts_per_ip_per_hour * RENDERS_PER_POST)
        self.minutely = RateLimit(RENDERS_PER_MINUTE, 60.0)
        self.spoken = RateLimit(web.max_audio_codes_per_minute, 60.0)
        self.image = ImageCaptcha(width=240, height=90)
        self.audio = AudioCaptcha()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="careservice-code")

    def admit(self, kind: str, client: str) -> float:
        """Count one `kind` ("png" or "wav") render for `client`: 0.0 when allowed, else seconds to wait."""
        limits = [(self.hourly, client), (self.minutely, client)]
        if kind == "wav":
            limits.append((self.spoken, ALL))
        return take_all(*limits)

    async def draw(self, kind: str, code: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._draw, kind, code)

    def _draw(self, kind: str, code: str) -> bytes:
        if kind == "wav":
            return bytes(self.audio.generate(code))
        return self.image.generate(code, bg_color=IMAGE_BACKGROUND, fg_color=IMAGE_DIGITS).getvalue()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
