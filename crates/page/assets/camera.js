// A camera preview in a panel, and one JPEG frame from it.

import { el, say } from "/api.js";

/**
 * Opens the rear camera in `panel` with a capture button (`captureTestId`). Resolves to a JPEG
 * Blob of the frame shown when it is tapped, or null if cancelled. Rejects with a sentence when
 * there is no camera or permission is refused.
 */
export async function captureFrame(panel, captureTestId) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("This browser gives no camera access here. Use the photo file button instead.");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
  } catch (err) {
    const why = err && err.name === "NotAllowedError" ? "camera permission was refused" : "no camera could be opened";
    throw new Error(`Camera unavailable (${why}). Use the photo file button instead.`);
  }
  const video = el("video", { autoplay: true, playsinline: true, muted: true, class: "preview" });
  video.srcObject = stream;
  return new Promise((resolve) => {
    const close = (blob) => {
      for (const track of stream.getTracks()) track.stop();
      panel.replaceChildren();
      panel.hidden = true;
      resolve(blob);
    };
    const capture = el("button", { type: "button", testid: captureTestId, class: "primary", text: "Take photo" });
    capture.addEventListener("click", async () => {
      capture.disabled = true;
      close(await frameAsJpeg(video));
    });
    const cancel = el("button", { type: "button", text: "Cancel", onclick: () => close(null) });
    panel.replaceChildren(video, el("div", { class: "row" }, capture, cancel));
    panel.hidden = false;
    video.play().catch(() => {});
  });
}

/**
 * Wires a photo source: a file input and a camera button (its preview in `panel`) both hand the
 * image to `use(blob, type)`; a camera that cannot open says why in `message`.
 */
export function photoSource({ file, camera, panel, captureTestId, message, use }) {
  file.addEventListener("change", () => {
    const f = file.files?.[0];
    if (f) use(f, f.type);
    file.value = "";
  });
  camera.addEventListener("click", async () => {
    try {
      const blob = await captureFrame(panel, captureTestId);
      if (blob) use(blob, "image/jpeg");
    } catch (err) {
      say(message, err.message, "error");
    }
  });
}

function frameAsJpeg(video) {
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth || 640;
  canvas.height = video.videoHeight || 480;
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob((b) => resolve(b), "image/jpeg", 0.9));
}
