// AudioWorklet processors of the omnivox voice page. They run on the audio rendering thread, so the
// page hears exactly what is captured and played, with timestamps on the AudioContext clock.

const BLOCK_SECONDS = 0.02;

function rootMeanSquare(samples, length) {
  let sum = 0;
  for (let i = 0; i < length; i++) sum += samples[i] * samples[i];
  return length ? Math.sqrt(sum / length) : 0;
}

// Lowers the rate of a stream of blocks (24 kHz -> 16 kHz for the WebSocket mode's microphone): a short
// windowed-sinc low-pass below the new Nyquist rate, then linear interpolation at the new sample times, with the
// filter's history and the fractional read position carried from block to block.
class Downsampler {
  constructor(fromRate, toRate, taps = 31) {
    this.step = fromRate / toRate;
    const cutoff = (0.45 * toRate) / fromRate;
    const middle = (taps - 1) / 2;
    this.taps = Float32Array.from({ length: taps }, (_, n) => {
      const x = n - middle;
      const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
      return sinc * (0.54 - 0.46 * Math.cos((2 * Math.PI * n) / (taps - 1)));
    });
    const gain = this.taps.reduce((sum, tap) => sum + tap, 0);
    this.taps = this.taps.map((tap) => tap / gain);
    this.history = new Float32Array(taps - 1);
    this.previous = 0; // the last filtered sample of the previous block, for interpolation across blocks
    this.position = 0; // read position in the current block's filtered samples (may be -1 < position < 0)
  }

  process(block) {
    const input = new Float32Array(this.history.length + block.length);
    input.set(this.history);
    input.set(block, this.history.length);
    const filtered = new Float32Array(block.length);
    for (let i = 0; i < block.length; i++) {
      let sum = 0;
      for (let k = 0; k < this.taps.length; k++) sum += this.taps[k] * input[i + k];
      filtered[i] = sum;
    }
    this.history = input.slice(block.length);
    const out = [];
    for (; this.position <= block.length - 1; this.position += this.step) {
      const left = Math.floor(this.position);
      const fraction = this.position - left;
      const a = left < 0 ? this.previous : filtered[left];
      const b = filtered[left + 1 < block.length ? left + 1 : left];
      out.push(a + (b - a) * fraction);
    }
    this.position -= block.length;
    this.previous = filtered[block.length - 1];
    return Float32Array.from(out);
  }
}

// Passes its input through and reports the level of every 20 ms block; with `sendRate` it also posts each
// block as PCM16 at that rate (the WebSocket mode's microphone capture).
class TapProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const sendRate = options.processorOptions && options.processorOptions.sendRate;
    this.sendPcm = Boolean(sendRate);
    this.downsampler = sendRate && sendRate !== sampleRate ? new Downsampler(sampleRate, sendRate) : null;
    this.block = new Float32Array(Math.round(sampleRate * BLOCK_SECONDS));
    this.filled = 0;
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0][0];
    const output = outputs[0] && outputs[0][0];
    if (!input) return true;
    if (output) output.set(input);
    for (let i = 0; i < input.length; i++) {
      this.block[this.filled++] = input[i];
      if (this.filled === this.block.length) this.flush(currentTime + (i + 1) / sampleRate);
    }
    return true;
  }

  flush(endTime) {
    const message = { level: rootMeanSquare(this.block, this.block.length), endTime, seconds: BLOCK_SECONDS };
    if (this.sendPcm) {
      const samples = this.downsampler ? this.downsampler.process(this.block) : this.block;
      const pcm = new Int16Array(samples.length);
      for (let i = 0; i < pcm.length; i++) {
        const s = Math.max(-1, Math.min(1, samples[i]));
        pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
      }
      message.pcm = pcm.buffer;
      this.port.postMessage(message, [pcm.buffer]);
    } else {
      this.port.postMessage(message);
    }
    this.filled = 0;
  }
}

// Gapless playback of the agent's PCM chunks, one queue for all items. It counts the samples of each item
// actually rendered, so a barge-in can truncate the item at what the caller really heard.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0;
    this.itemId = null;
    this.playedInItem = 0;
    this.playedTotal = 0;
    this.sinceReport = 0;
    this.idle = true;
    this.port.onmessage = (event) => this.command(event.data);
  }

  command(message) {
    if (message.type === "push") {
      this.queue.push({ itemId: message.itemId, samples: new Float32Array(message.samples) });
    } else if (message.type === "clear") {
      const dropped = this.queue.reduce((sum, chunk) => sum + chunk.samples.length, 0) - this.offset;
      this.queue = [];
      this.offset = 0;
      const played = this.playedInItem;
      this.port.postMessage({ type: "cleared", itemId: this.itemId, played, dropped, time: currentTime });
    }
  }

  process(inputs, outputs) {
    const output = outputs[0][0];
    let written = 0;
    while (written < output.length && this.queue.length) {
      const chunk = this.queue[0];
      if (chunk.itemId !== this.itemId) {
        this.itemId = chunk.itemId;
        this.playedInItem = 0;
      }
      if (this.idle) {
        this.idle = false;
        this.port.postMessage({ type: "started", itemId: chunk.itemId, time: currentTime + written / sampleRate });
      }
      const count = Math.min(output.length - written, chunk.samples.length - this.offset);
      output.set(chunk.samples.subarray(this.offset, this.offset + count), written);
      written += count;
      this.offset += count;
      this.playedInItem += count;
      if (this.offset === chunk.samples.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    output.fill(0, written);
    for (let channel = 1; channel < outputs[0].length; channel++) outputs[0][channel].set(output);
    this.playedTotal += written;
    this.sinceReport += output.length;
    if (!this.idle && !this.queue.length) {
      this.idle = true;
      const time = currentTime + written / sampleRate;
      this.port.postMessage({ type: "drained", playedTotal: this.playedTotal, time });
    } else if (this.sinceReport >= sampleRate * 0.1) {
      this.sinceReport = 0;
      this.port.postMessage({ type: "progress", playedTotal: this.playedTotal });
    }
    return true;
  }
}

registerProcessor("omnivox-tap", TapProcessor);
registerProcessor("omnivox-playback", PlaybackProcessor);
