// Which Layer Balance inputs its source leaves unused (a pure rule, kept apart so it can be tested without a browser).

export const LAYER_BALANCE = "MultiCond_LayerBalance";
export const EVENLY_SPACED = "evenly spaced (only_self_level)";
// Inputs one source uses; the node's other inputs (model, source, lambda_t, group_norm) apply to every source.
export const SOURCE_INPUTS = {
  grading: ["grading", "lambda_s"],
  preset: ["preset", "only_self_level"],
  blocks: ["blocks"],
};

export function unusedInputs(source, preset) {
  const all = Object.values(SOURCE_INPUTS).flat();
  const used = new Set(SOURCE_INPUTS[source] ?? all); // an unknown source hides nothing
  if (source === "preset" && preset !== EVENLY_SPACED) used.delete("only_self_level");
  return all.filter((name) => !used.has(name));
}
