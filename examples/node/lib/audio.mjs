// PCM16 audio helpers shared by the example clients and their tests: WAV in/out, resampling to the
// 24 kHz the Realtime API requires, speech from espeak-ng, base64 chunking for input_audio_buffer.append.

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

export const REALTIME_RATE = 24_000;

/** Reads a PCM16 WAV (any rate, any channel count) into mono samples; refuses other encodings. */
export function decodeWav(buffer) {
  if (buffer.toString('ascii', 0, 4) !== 'RIFF' || buffer.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error('not a RIFF/WAVE file');
  }
  let format = null;
  let offset = 12;
  while (offset + 8 <= buffer.length) {
    const chunkId = buffer.toString('ascii', offset, offset + 4);
    const declaredSize = buffer.readUInt32LE(offset + 4);
    const body = offset + 8;
    // Streaming writers (espeak-ng --stdout) leave the size at 0xFFFFFFFF: the chunk runs to the end.
    const size = Math.min(declaredSize, buffer.length - body);
    if (chunkId === 'fmt ') {
      format = {
        encoding: buffer.readUInt16LE(body),
        channels: buffer.readUInt16LE(body + 2),
        rate: buffer.readUInt32LE(body + 4),
        bits: buffer.readUInt16LE(body + 14),
      };
    } else if (chunkId === 'data') {
      if (!format) throw new Error('WAV data chunk before its fmt chunk');
      if (format.encoding !== 1 || format.bits !== 16) {
        throw new Error(`only 16-bit PCM WAV is supported (format ${format.encoding}, ${format.bits} bits)`);
      }
      const frames = Math.floor(size / 2 / format.channels);
      const samples = new Int16Array(frames);
      for (let frame = 0; frame < frames; frame += 1) {
        let sum = 0;
        for (let channel = 0; channel < format.channels; channel += 1) {
          sum += buffer.readInt16LE(body + (frame * format.channels + channel) * 2);
        }
        samples[frame] = Math.round(sum / format.channels);
      }
      return { rate: format.rate, samples };
    }
    offset = body + size + (size % 2);
  }
  throw new Error('WAV file has no data chunk');
}

/** A mono PCM16 WAV file. */
export function encodeWav(samples, rate = REALTIME_RATE) {
  const header = Buffer.alloc(44);
  const dataBytes = samples.length * 2;
  header.write('RIFF', 0, 'ascii');
  header.writeUInt32LE(36 + dataBytes, 4);
  header.write('WAVEfmt ', 8, 'ascii');
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(1, 20);
  header.writeUInt16LE(1, 22);
  header.writeUInt32LE(rate, 24);
  header.writeUInt32LE(rate * 2, 28);
  header.writeUInt16LE(2, 32);
  header.writeUInt16LE(16, 34);
  header.write('data', 36, 'ascii');
  header.writeUInt32LE(dataBytes, 40);
  return Buffer.concat([header, pcm16Bytes(samples)]);
}

/** Linear-interpolation resampling: plenty for speech going into a VAD and an ASR front end. */
export function resample(samples, fromRate, toRate = REALTIME_RATE) {
  if (fromRate === toRate) return samples;
  const length = Math.floor((samples.length * toRate) / fromRate);
  const out = new Int16Array(length);
  const step = fromRate / toRate;
  for (let index = 0; index < length; index += 1) {
    const position = index * step;
    const left = Math.floor(position);
    const right = Math.min(left + 1, samples.length - 1);
    const fraction = position - left;
    out[index] = Math.round(samples[left] * (1 - fraction) + samples[right] * fraction);
  }
  return out;
}

/** `text` spoken by espeak-ng, as 24 kHz mono PCM16 samples. */
export function synthesizeSpeech(text, { voice = 'en-us', rate = REALTIME_RATE } = {}) {
  const result = spawnSync('espeak-ng', ['-v', voice, '--stdout', text], { maxBuffer: 64 << 20 });
  if (result.error) {
    throw new Error(`espeak-ng could not run (${result.error.message}); install espeak-ng or use --wav`);
  }
  if (result.status !== 0) throw new Error(`espeak-ng failed: ${result.stderr.toString().trim()}`);
  const wav = decodeWav(result.stdout);
  return resample(wav.samples, wav.rate, rate);
}

/** A WAV file's speech as 24 kHz mono PCM16 samples. */
export function readWavFile(path) {
  const wav = decodeWav(readFileSync(path));
  return resample(wav.samples, wav.rate, REALTIME_RATE);
}

/** Little-endian bytes of PCM16 samples (what the Realtime API calls pcm16 / audio/pcm). */
export function pcm16Bytes(samples) {
  const bytes = Buffer.alloc(samples.length * 2);
  samples.forEach((sample, index) => bytes.writeInt16LE(sample, index * 2));
  return bytes;
}

/** PCM16 samples of little-endian bytes; an odd trailing byte is a protocol violation, so refuse it. */
export function pcm16Samples(bytes) {
  if (bytes.length % 2 !== 0) throw new Error(`PCM16 audio has an odd byte count (${bytes.length})`);
  const samples = new Int16Array(bytes.length / 2);
  for (let index = 0; index < samples.length; index += 1) samples[index] = bytes.readInt16LE(index * 2);
  return samples;
}

/** `input_audio_buffer.append` events of `chunkMs` each, as a streaming client sends them. */
export function appendEvents(samples, chunkMs = 100, rate = REALTIME_RATE) {
  const chunk = Math.max(1, Math.floor((rate * chunkMs) / 1000));
  const events = [];
  for (let start = 0; start < samples.length; start += chunk) {
    const audio = pcm16Bytes(samples.subarray(start, start + chunk)).toString('base64');
    events.push({ type: 'input_audio_buffer.append', audio });
  }
  return events;
}

/** Peak absolute amplitude, 0..1: tells real audio from silence. */
export function peak(samples) {
  let max = 0;
  for (const sample of samples) max = Math.max(max, Math.abs(sample));
  return max / 32768;
}
