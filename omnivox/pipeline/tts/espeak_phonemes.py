"""Text -> IPA phonemes with the espeak-ng library (what Piper voices were trained on), through ctypes.

The library is the system's `libespeak-ng.so.1` (Debian `libespeak-ng1`, installed with `espeak-ng`, which omnivox
already needs); it phonemizes offline. espeak-ng keeps global state, so calls are serialised by one lock; ctypes
releases the GIL while the library works.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import threading

_SYNCHRONOUS = 2
"""espeak_AUDIO_OUTPUT AUDIO_OUTPUT_SYNCHRONOUS: no audio device, no background thread."""
_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02
_PIECE_END = re.compile(r"(?<=[,.;:!?])\s+")
_TRAILING_PUNCTUATION = re.compile(r"[,.;:!?]+$")


class EspeakUnavailable(RuntimeError):
    """The espeak-ng library is missing."""


class _Library:
    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise EspeakUnavailable(
                f"the espeak-ng library ({name}) cannot be loaded: {exc}; install it with `apt-get install espeak-ng`"
            ) from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        if lib.espeak_Initialize(_SYNCHRONOUS, 0, None, 0) <= 0:
            raise EspeakUnavailable("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self.lib = lib
        self.voice = ""

    def phonemes(self, text: str, voice: str) -> str:
        """IPA of one piece of text (espeak-ng may split it into several clauses: they are joined by spaces)."""
        if voice != self.voice:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.voice = voice
        buffer = ctypes.create_string_buffer(text.encode())
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        pieces = []
        while pointer.value:
            piece = self.lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA)
            if piece:
                pieces.append(piece.decode(errors="replace").strip())
        return " ".join(piece for piece in pieces if piece)


_library: _Library | None = None
_lock = threading.Lock()


def phonemize(text: str, voice: str = "en-us") -> str:
    """IPA phonemes of `text` with its clause punctuation kept (`,` `.` `?` ... end the phonemes of their clause),
    words separated by single spaces, stress marks included, as Piper expects."""
    global _library
    pieces = [piece for piece in _PIECE_END.split(text.strip()) if piece]
    results = []
    with _lock:
        if _library is None:
            _library = _Library()
        for piece in pieces:
            phonemes = _library.phonemes(piece, voice)
            punctuation = _TRAILING_PUNCTUATION.search(piece)
            results.append(phonemes + (punctuation.group()[-1] if punctuation and phonemes else ""))
    return " ".join(result for result in results if result)
