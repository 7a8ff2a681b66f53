// AudioWorklet processors of the omnivox voice page. They run on the audio rendering thread, so the
// page hears exactly what is captured and played, with timestamps on the AudioContext clock.

const BLOCK_SECONDS = 0.02;

function rootMeanSquare(samples, length) {
  let sum = 0;
  for (let i = 0; i < length; i++) sum += samples[i] * samples[i];
  return length ? Math.sqrt(sum / length) : 0;
}

// Passes its input through and reports the level of every 20 ms block; with `sendPcm` it also posts each
// block as PCM16 (the WebSocket mode's microphone capture at the context rate, 24 kHz).
class TapProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.sendPcm = Boolean(options.processorOptions && options.processorOptions.sendPcm);
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
      const pcm = new Int16Array(this.block.length);
      for (let i = 0; i < pcm.length; i++) {
        const s = Math.max(-1, Math.min(1, this.block[i]));
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
