package dev.hark.client;

import io.apicurio.registry.serde.avro.AvroKafkaDeserializer;
import java.io.FileInputStream;
import java.io.InputStream;
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.StringDeserializer;

/**
 * Reads a tenant's published topic and prints each record as one JSON line: stream_id, kind,
 * text (plus the key, whether the record carries the hark.final header, partition and offset).
 * A tombstone prints with kind and text null. Nothing here knows hark: the consumer is Apache
 * Kafka's, the value deserializer Apicurio's, reading Confluent framing (magic 0, 4-byte content
 * id; Apicurio 3's defaults) from the registry named in the properties file.
 *
 * <p>Usage: PublishedConsumer CONFIG.properties TOPIC [MAX_RECORDS [TIMEOUT_S]]. CONFIG holds
 * ordinary consumer properties (bootstrap.servers, group.id, the SASL login) and
 * apicurio.registry.url; it is a file so that the password never shows in a process list. The
 * consumer commits what it printed, so a second run in the same group goes on from there.
 */
public final class PublishedConsumer {
    private PublishedConsumer() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: PublishedConsumer CONFIG.properties TOPIC [MAX_RECORDS [TIMEOUT_S]]");
            System.exit(2);
        }
        Properties props = new Properties();
        try (InputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        String topic = args[1];
        long max = args.length > 2 ? Long.parseLong(args[2]) : Long.MAX_VALUE;
        long deadline = System.nanoTime() + Duration.ofSeconds(args.length > 3 ? Long.parseLong(args[3]) : 60).toNanos();
        props.putIfAbsent(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        props.putIfAbsent(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, AvroKafkaDeserializer.class.getName());
        props.putIfAbsent(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        props.putIfAbsent(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");

        long printed = 0;
        try (KafkaConsumer<String, GenericRecord> consumer = new KafkaConsumer<>(props)) {
            consumer.subscribe(List.of(topic));
            while (printed < max && System.nanoTime() < deadline) {
                ConsumerRecords<String, GenericRecord> batch = consumer.poll(Duration.ofMillis(500));
                for (ConsumerRecord<String, GenericRecord> rec : batch) {
                    System.out.println(line(rec));
                    printed++;
                }
                System.out.flush();
                if (!batch.isEmpty()) {
                    consumer.commitSync();
                }
            }
        }
        System.exit(printed >= max || max == Long.MAX_VALUE ? 0 : 1);
    }

    private static String line(ConsumerRecord<String, GenericRecord> rec) {
        GenericRecord v = rec.value();
        StringBuilder out = new StringBuilder("{");
        field(out, "stream_id", v == null ? rec.key() : str(v.get("stream_id"))).append(',');
        field(out, "kind", v == null ? null : str(v.get("kind"))).append(',');
        field(out, "text", v == null ? null : str(v.get("text"))).append(',');
        field(out, "key", rec.key()).append(',');
        out.append("\"final\":").append(rec.headers().lastHeader("hark.final") != null).append(',');
        out.append("\"partition\":").append(rec.partition()).append(',');
        out.append("\"offset\":").append(rec.offset());
        return out.append('}').toString();
    }

    private static String str(Object o) {
        return o == null ? null : o.toString(); // Avro strings arrive as Utf8
    }

    private static StringBuilder field(StringBuilder out, String name, String value) {
        quote(out, name).append(':');
        return value == null ? out.append("null") : quote(out, value);
    }

    private static StringBuilder quote(StringBuilder out, String s) {
        out.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"');
    }
}
